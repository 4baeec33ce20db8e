"""Stages: one per trained model (build from settings, train, load, predict)."""
