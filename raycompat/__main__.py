from raycompat.cli import main

raise SystemExit(main())
