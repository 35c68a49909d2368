"""The gRPC contract between the proxy and the learner: flywheel.proto and its generated code.

`python -m flywheel.protos.generate` regenerates flywheel_pb2*.py (committed; tests fail if
stale). Imports nothing of Flywheel.
"""
