"""Serving trained runs to people: the steering façade the CLI and the preference app share."""

from nps.serve.steering import SteeringRun

__all__ = ["SteeringRun"]
