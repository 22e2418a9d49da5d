"""The fabric every ragloom service stands on: server bootstrap, client channels, settings, launcher."""
