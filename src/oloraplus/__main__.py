from oloraplus.cli import main

raise SystemExit(main())
