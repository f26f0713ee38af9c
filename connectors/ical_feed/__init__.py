"""Read-only EHR calendar feeds (iCal export URLs, SimplePractice-style), with a worklist."""
