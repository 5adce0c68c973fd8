from lofid.daemon import main

raise SystemExit(main())
