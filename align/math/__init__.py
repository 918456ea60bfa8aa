"""Pure math of the methods: functions of tensors and floats, each citing its paper and equation.
Imports torch and nothing else from the project or the ML stack (a test holds it to that)."""
