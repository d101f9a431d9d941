"""The research layer: the comparison grid (``reproduce``, ``sweep``, ``rescore``), the report and
its regime section. Depends on everything below it; nothing in the library imports it.
"""
