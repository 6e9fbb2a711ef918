"""The competition's HTTP API: /process, /tokenize, /decode (as HELM's HTTPModelClient speaks it)."""
