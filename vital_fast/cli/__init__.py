"""The ``vital-fast`` command-line tool: demo, layers, visualize, report, compare, bench."""
