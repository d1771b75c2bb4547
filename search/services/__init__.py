"""What each command does, as functions of typed requests: the command line and the Python API both call these.

A command turns its arguments into a request, calls one function here and prints the result; a notebook
builds the same request (or calls `search.api`) and gets the same result.
"""
