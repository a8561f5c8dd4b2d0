"""What the user's web page touches: the viewer, the dashboard and their static files."""
