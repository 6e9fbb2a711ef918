from daytune.cli import main

raise SystemExit(main())
