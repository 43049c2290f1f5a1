"""The pure core: what WeChat's documentation says (records, policy, quota arithmetic, errcodes,
answer cleaning). It imports no I/O library and nothing of keeper but ``errors``; time is a
parameter."""
