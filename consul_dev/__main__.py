from consul_dev.app import main

raise SystemExit(main())
