"""The ``intactkv`` command: diagnose, quantize, evaluate and inspect without writing a script.

:mod:`.app` declares the commands and does the work through the package's
functions, :mod:`.output` decides what reaches the terminal (results on stdout;
progress, library logs and one-line errors on stderr), :mod:`.views` draws the
results.
"""
