"""Actors: plain classes that own a model and a device; ray.remote is applied where the system is assembled."""
