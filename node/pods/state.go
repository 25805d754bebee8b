package pods

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
)

// State is what the agent keeps on the node about a meshed pod, so that a
// restarted agent re-attaches running pods without restarting them (the
// pods' TUNs are persistent).
type State struct {
	ContainerID string       `json:"containerID"`
	Netns       string       `json:"netns"`
	Namespace   string       `json:"namespace"`
	Name        string       `json:"name"`
	Addrs       []netip.Addr `json:"addrs"`
}

// ErrBadContainerID means a container ID cannot name a state file.
var ErrBadContainerID = errors.New("invalid container ID")

// CheckContainerID accepts what runtimes use (hex digests, UUIDs, names of
// letters, digits, '-', '_', '.') and nothing that could walk the file
// system: a container ID becomes a file name.
func CheckContainerID(id string) error {
	if id == "" || len(id) > 256 || strings.HasPrefix(id, ".") {
		return fmt.Errorf("%w %q", ErrBadContainerID, id)
	}
	for _, c := range id {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
		default:
			return fmt.Errorf("%w %q: character %q", ErrBadContainerID, id, c)
		}
	}
	return nil
}

// Store keeps State files under Dir/pods.
type Store struct{ Dir string }

func (s Store) dir() string { return filepath.Join(s.Dir, "pods") }

func (s Store) path(containerID string) (string, error) {
	if err := CheckContainerID(containerID); err != nil {
		return "", err
	}
	return filepath.Join(s.dir(), containerID+".json"), nil
}

// Save writes st atomically.
func (s Store) Save(st State) error {
	path, err := s.path(st.ContainerID)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(s.dir(), 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	b, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("encode pod state: %w", err)
	}
	if err := os.WriteFile(path+".tmp", b, 0o600); err != nil {
		return fmt.Errorf("write pod state: %w", err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		return fmt.Errorf("write pod state: %w", err)
	}
	return nil
}

// Drop removes the state of containerID; a missing file is fine.
func (s Store) Drop(containerID string) error {
	path, err := s.path(containerID)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove pod state: %w", err)
	}
	return nil
}

// LoadAll reads every state file. Unreadable files are removed and
// reported in bad (file name -> error).
func (s Store) LoadAll() (states []State, bad map[string]error, err error) {
	ents, err := os.ReadDir(s.dir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read pod state: %w", err)
	}
	bad = map[string]error{}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		file := filepath.Join(s.dir(), e.Name())
		b, err := os.ReadFile(file)
		var st State
		if err == nil {
			err = json.Unmarshal(b, &st)
		}
		if err == nil && CheckContainerID(st.ContainerID) != nil {
			err = CheckContainerID(st.ContainerID)
		}
		if err != nil {
			bad[e.Name()] = err
			_ = os.Remove(file)
			continue
		}
		states = append(states, st)
	}
	return states, bad, nil
}
