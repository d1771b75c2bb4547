"""The built-in model families of the study, one module each; `search.family` registers every one it finds here.

Adding a family is adding a module here that defines a `search.family.Family` (and its tests).
"""
