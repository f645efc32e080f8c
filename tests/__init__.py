"""The tests of llm_proxy; run them all with python3 test_llm_proxy.py."""
