package install

import (
	"encoding/json"
	"fmt"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// listItems reads the objects of a v1 List (install -o json).
func listItems(s string) ([]*unstructured.Unstructured, error) {
	var l struct {
		Kind  string           `json:"kind"`
		Items []map[string]any `json:"items"`
	}
	if err := json.Unmarshal([]byte(s), &l); err != nil {
		return nil, err
	}
	if l.Kind != "List" {
		return nil, fmt.Errorf("kind %q, want List", l.Kind)
	}
	var out []*unstructured.Unstructured
	for _, it := range l.Items {
		out = append(out, &unstructured.Unstructured{Object: it})
	}
	return out, nil
}
