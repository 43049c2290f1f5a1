"""Looking at keeper from outside: the database's side of the metrics (a Prometheus collector
with a short cache), the re-login forecast, and the status page's report. Reads the store;
writes nothing."""
