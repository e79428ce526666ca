"""Streaming signal processing, features and the inference backends of the
recurrent decoder; runs on the Jetson without torch or scipy::

    dsp.py, features.py, pipeline.py    filter chain (numpy), window features, the feature pipeline
    filter_design.py                    turning cut-offs into filter coefficients (scipy, workstation)
    onnx_weights.py                     reading the exported model's weights without onnx
    backend_registry.py, backends/      TensorRT, ONNX Runtime and numpy backends behind one interface
"""
