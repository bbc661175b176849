"""The benchmark harness: sqlproxy against direct PostgreSQL, haproxy and stunnel."""
