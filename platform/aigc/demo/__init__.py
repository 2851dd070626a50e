"""The offline demo: its dataset generator, the tiny base model builder and the demo driver.

Nothing here is needed to use the platform on real data; the demo and the tests use it so that no model or
dataset is ever downloaded.
"""
