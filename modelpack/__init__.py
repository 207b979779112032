"""The contract every part of CP-CNN Serve shares: a model package and how it runs.

``manifest`` (the package schema), ``activator`` (Algorithm 1 and Eq. 3), ``preprocess`` (pixels
prepared the same way in training and serving), ``runner`` (a package executed on a backend) and
``sweep`` (what the offline τ sweep predicts). No torch and no HTTP here: training, export, bench
and the service import this package, and it imports none of them.
"""
