"""One module per tab of the UI; common.py holds the panels they share."""
