"""The composition root: configuration in; database, gateway, stages, runner, daemon and servers out.

It is the one place that knows every layer: cli.py calls it, it wires `scanners` (the stages) and
`gateway` (WeChat Pay) to `engine` (which knows neither).
"""
