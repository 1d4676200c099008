"""`python -m sampler_service serve ...`"""
import sys

from sampler_service.cli import main

sys.exit(main())
