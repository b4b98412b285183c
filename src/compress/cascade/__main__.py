"""`python -m compress.cascade`: the command line of compress/cascade/__init__.py."""
from compress.cascade import main

main()
