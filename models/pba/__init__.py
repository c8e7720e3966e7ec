"""PBA bandwidth forecaster: data loading, feature spec, baselines, training, ONNX export.

The feature spec lives in ``models/FEATURES.md`` and its constants in
``models/features.json``; the Rust crate ``dwcp-prediction`` implements the same spec and
both sides check the golden vectors in ``models/golden/``.
"""
