"""The usage ledger: the log projected into tokens, requests and cost per day, key and model."""
