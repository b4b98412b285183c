"""`python -m utils.cascade`: the command line of utils/cascade/__init__.py."""
from utils.cascade import main

main()
