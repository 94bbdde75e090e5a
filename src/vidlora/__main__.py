from vidlora.cli import main

raise SystemExit(main())
