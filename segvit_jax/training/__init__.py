"""Training: the sharded train state and step, the loop that runs them, the run's logs, and the
checks of a config against the devices and processes before anything is built.
"""
