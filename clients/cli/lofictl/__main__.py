from lofictl.cli import main

raise SystemExit(main())
