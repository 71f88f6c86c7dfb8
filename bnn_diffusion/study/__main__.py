"""``python -m bnn_diffusion.study``: see ``bnn_diffusion.study.run``."""
from .run import main

raise SystemExit(main())
