"""Server side: the Flower ServerApp, strategy building, checkpoint/resume and the server launcher."""
