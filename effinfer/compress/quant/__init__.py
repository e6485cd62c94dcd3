"""Offline quantization methods (``effinfer quantize``): RTN, GPTQ, AWQ, SmoothQuant, LLM.int8(), NF4 / FP4.

Each takes a float model and leaves its decoder Linears holding ``effinfer.quant`` weights;
``pipeline.METHODS`` names them and ``formats.py`` writes the result as a checkpoint.
"""
