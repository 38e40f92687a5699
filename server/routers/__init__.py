"""HTTP routes, one module per group; the logic they call lives in server/assist.py and friends."""
