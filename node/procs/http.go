package procs

import (
	"fmt"
	"net/http"
	"runtime"
	"strconv"
)

// Handler is the debug endpoint of the scheduler size (the agent serves it
// on its loopback-only debug address). GET prints the Ps and who decides
// them; POST n=N pins N Ps (g must be the running Governor), n=auto hands
// back to the policy. For experiments: A/B runs on one live agent without
// a restart (docs/performance.md).
func Handler(g *Governor) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
		case http.MethodPost:
			if g == nil {
				http.Error(w, "procs: fixed by --procs or GOMAXPROCS, not auto", http.StatusConflict)
				return
			}
			v := r.FormValue("n")
			if v == "auto" {
				g.Pin(0)
				break
			}
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 1024 {
				http.Error(w, fmt.Sprintf("procs: n=%q: want auto or 1..1024", v), http.StatusBadRequest)
				return
			}
			g.Pin(n)
		default:
			w.Header().Set("Allow", "GET, POST")
			http.Error(w, "GET or POST", http.StatusMethodNotAllowed)
			return
		}
		mode := "fixed"
		if g != nil {
			mode = "auto"
			if p := g.Pinned(); p > 0 {
				mode = "pinned " + strconv.Itoa(p) + " (from the next interval)"
			}
		}
		fmt.Fprintf(w, "procs %d %s\n", runtime.GOMAXPROCS(0), mode)
	})
}
