from qsae_lens.cli import main

raise SystemExit(main())
