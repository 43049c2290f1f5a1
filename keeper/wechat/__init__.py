"""WeChat: the client of its four OAuth2 endpoints (``client``) and the simulator that imitates
them (``simulator``, a test tool shipped for ``keeper simulate``, demo and the benchmarks)."""
