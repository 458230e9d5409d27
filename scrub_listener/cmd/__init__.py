"""Console entry points (``main()`` functions only)."""

import warnings

# futurist imports eventlet when it happens to be installed (glance pulls it
# in on the same host) and eventlet then warns on every start.  We never
# use eventlet; keep that noise out of operators' terminals.
warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')
