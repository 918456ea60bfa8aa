"""Data: prompt sets (the embedded task's splits or a user's file or dataset) and preference pairs."""
