"""The built-in model families of the study, one module each; `search.family` registers every one it finds here.

Adding a family is adding a module here that defines a `search.family.Family` named as the module (and its
tests). Installed packages add theirs through the entry-point group below. Importing this package is cheap:
the command line lists the family names from it without importing torch.
"""

ENTRY_POINT_GROUP = "stl10_search.families"
