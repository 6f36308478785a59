import sys

from metarl_tf.cli import main

sys.exit(main())
