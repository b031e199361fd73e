"""Running models fast and measuring them: device and precision (`device`), MACs (`flops`), timing
(`bench`), ONNX export and ONNX Runtime (`deploy`) and speed-ups (`speedups`)."""
