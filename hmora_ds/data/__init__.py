"""Data: Flan v2 builder, local datasets, the offline mixture, tokenisation and sampling."""
