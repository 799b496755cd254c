"""The simulator: presets, the analytic model, the SimPy engine and the capacity planner.

``presets``, ``calibration`` and ``analytic`` need only numpy (the GPU validator uses them);
``engine`` and ``capacity`` add simpy and the trace reader.
"""
