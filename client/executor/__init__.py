"""fedshop's SuperExec for a merchant: runs each ClientApp task in a process forked from a warm fork server."""
