package devcluster

import (
	"slices"
	"testing"
)

func TestAgentEnv(t *testing.T) {
	if env := agentEnv([]string{"PATH=/bin", "GOGC=off"}); env != nil {
		t.Errorf("no agent variables: got %q, want nil (inherit)", env)
	}
	caller := []string{"PATH=/bin", "TUNMESH_AGENT_GOMEMLIMIT=40MiB", "TUNMESH_AGENT_GODEBUG=memprofilerate=4096", "TUNMESH_AGENT_PATH=/x", "GOMEMLIMIT=1GiB"}
	env := agentEnv(caller)
	for _, want := range []string{"PATH=/bin", "GOMEMLIMIT=40MiB", "GODEBUG=memprofilerate=4096"} {
		if !slices.Contains(env, want) {
			t.Errorf("env %q lacks %q", env, want)
		}
	}
	if slices.Contains(env, "PATH=/x") {
		t.Errorf("env %q: only GODEBUG, GOGC and GOMEMLIMIT are forwarded", env)
	}
	// The agent's GOMEMLIMIT comes after the caller's: exec keeps the last.
	if slices.Index(env, "GOMEMLIMIT=40MiB") < slices.Index(env, "GOMEMLIMIT=1GiB") {
		t.Errorf("env %q: agent value must come last", env)
	}
	if caller[len(caller)-1] != "GOMEMLIMIT=1GiB" || len(caller) != 5 {
		t.Errorf("caller's slice changed: %q", caller)
	}
}
